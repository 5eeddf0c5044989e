"""FrozenOptimizer: apply an exported learned optimizer in any training loop."""

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from compiledopt._validation import check_real
from compiledopt.export.artifact import BACKENDS, Artifact, ArtifactError, load_artifact
from compiledopt.runtime.compiled import INDUCTOR_OPTIONS, CompiledTensorRule
from compiledopt.export.rule import ModelRule
from compiledopt.runtime.rounding import STATE_DTYPES, round_state

logger = logging.getLogger("compiledopt")

RUNTIME_BACKENDS = ("eager", "compiled", *BACKENDS)
# "auto" takes the first available, fastest first (PERF-NOTES: AOTInductor ≈ compiled ≫ ONNX
# Runtime > TorchScript on CPU for per-coordinate rules; eager always works).
AUTO_ORDER = ("aoti", "compiled", "onnx", "torchscript", "eager")
NONFINITE_POLICIES = ("skip", "raise")


class FrozenOptimizer(Optimizer):
    r"""A ``torch.optim.Optimizer`` whose update rule is a frozen, exported learned optimizer.

    Each step computes, for every parameter ``p`` with a gradient ``g``, the artifact's direction
    ``d = T(g, p, state, step)`` and applies ``p ← p − lr · wd · p − lr · d`` (decoupled weight
    decay ``wd``), carrying the rule's state in ``optimizer.state[p]``.

    Args:
        params (iterable): tensors, ``(name, tensor)`` pairs (``model.named_parameters()``), or
            param-group dicts (each may set ``lr`` and ``weight_decay``).
        artifact (str, PathLike or Artifact): an artifact directory (see
            ``docs/artifact-format.md``). A ``bound`` artifact binds to the parameters by name
            (when named) and shape, in order, and refuses a mismatch naming the parameter; a
            ``shape_agnostic`` one applies to any parameters.
        lr (float, optional): learning rate (default: the artifact's ``lr``).
        backend (str, optional): ``"eager"`` (the transform rebuilt from the weights),
            ``"compiled"`` (``torch.compile`` of the frozen rule), ``"torchscript"``, ``"onnx"``
            (ONNX Runtime), ``"aoti"`` (AOTInductor), or ``"auto"``: the first available of
            ``aoti, compiled, onnx, torchscript, eager``; ``optimizer.backend`` says which.
            (default: "auto")
        weight_decay (float, optional): decoupled weight decay. (default: 0.0)
        nonfinite (str, optional): when a group has a NaN or infinite gradient, ``"skip"`` the
            step for that group (its parameters and state stay as they are; counted in
            ``optimizer.skipped_steps``) or ``"raise"`` ``FloatingPointError`` before any
            parameter is touched. (default: "skip")
        state_dtype (torch.dtype, optional): storage dtype of the rule's state. ``None`` keeps
            the artifact's dtype; ``torch.bfloat16`` halves the state's memory (CoordinateMLP:
            2 instead of 4 floats per parameter): the rule still computes in the artifact's
            dtype and the new state is stochastically rounded to bfloat16 (unbiased, so slow
            accumulators such as a 0.999-decay second moment keep tracking; see
            ``compiledopt.runtime.rounding``). On the ``compiled`` backend the conversions and the
            rounding run inside the compiled graph. (default: None)

    Parameters that get no gradient in a step are left untouched, state included. Computation
    runs in the artifact's dtype: a bf16/fp16 model's gradients are upcast, the state is kept in
    the artifact's dtype (float32) unless ``state_dtype`` says otherwise, and the update is cast
    back; ``torch.amp.GradScaler`` works as with any optimizer. The learning rate is applied
    outside the graphs, so LR schedulers never cause a recompile.

    Example:
        >>> optimizer = FrozenOptimizer(model.parameters(), "export/coordinate-mlp", lr=1e-3)
        >>> for x, y in loader:
        ...     optimizer.zero_grad()
        ...     loss_fn(model(x), y).backward()
        ...     optimizer.step()
    """

    def __init__(
        self,
        params: Iterable[Any],
        artifact: "str | os.PathLike | Artifact",
        lr: Optional[float] = None,
        backend: str = "auto",
        weight_decay: float = 0.0,
        nonfinite: str = "skip",
        state_dtype: Optional[torch.dtype] = None,
    ) -> None:
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact)
        if state_dtype is not None and state_dtype not in (self.artifact.dtype, *STATE_DTYPES):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None, the artifact's "
                f"{self.artifact.dtype}, or one of {STATE_DTYPES})"
            )
        self.state_dtype = self.artifact.dtype if state_dtype is None else state_dtype
        lr = float(self.artifact.manifest["lr"]) if lr is None else lr
        check_real(lr, "lr", 0.0)
        check_real(weight_decay, "weight_decay", 0.0)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (one of {NONFINITE_POLICIES})")
        if backend != "auto" and backend not in RUNTIME_BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (one of {('auto', *RUNTIME_BACKENDS)})")
        self.nonfinite = nonfinite
        self.skipped_steps = 0
        self._initialised = False
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self._transforms = self.artifact.transforms()
        if self.artifact.kind == "bound":
            named = all(group.get("param_names") for group in self.param_groups)
            self.artifact.check_bindings(self._named(), check_dtype=False, check_names=named)
        self.backend = self._choose(backend)
        self._run = self._make_runner(self.backend)
        self._initialised = True
        logger.info(
            "FrozenOptimizer: %s artifact %s on the %s backend",
            self.artifact.kind,
            self.artifact.path,
            self.backend,
        )

    # -- construction -----------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if getattr(self, "_initialised", False) and self.artifact.kind == "bound":
            raise ValueError(
                f"{self.artifact.path} is bound to {len(self.artifact.bindings)} parameters; "
                "a bound artifact cannot take another parameter group"
            )
        for key in ("lr", "weight_decay"):
            if key in param_group:
                check_real(param_group[key], key, 0.0)
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group["params"] = params
        for item in params:
            name, param = item if isinstance(item, tuple) and len(item) == 2 else (None, item)
            if not isinstance(param, Tensor):
                raise TypeError(f"FrozenOptimizer params must be tensors, got {type(param)}")
            label = repr(name) if name is not None else f"of shape {tuple(param.shape)}"
            if param.is_complex() or not param.is_floating_point():
                raise ValueError(
                    f"FrozenOptimizer supports real floating-point parameters; parameter {label} "
                    f"has dtype {param.dtype}"
                )
        super().add_param_group(param_group)

    def _named(self) -> List[Tuple[str, Tensor]]:
        named = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for i, (param, name) in enumerate(zip(group["params"], names)):
                named.append((name if name is not None else f"params[{i}]", param))
        return named

    def _choose(self, backend: str) -> str:
        available = set(self.artifact.backends) | {"eager", "compiled"}
        if backend == "auto":
            return next(b for b in AUTO_ORDER if b in available)
        if backend not in available:
            raise ArtifactError(
                f"{self.artifact.path} has no {backend} graph (it has {self.artifact.backends})"
            )
        return backend

    def _make_runner(self, backend: str) -> Callable:
        transforms = self._transforms
        if self.artifact.kind == "bound":
            counts = [
                len(t.init_state(torch.zeros(b["shape"], dtype=self.artifact.dtype)))
                for t, b in zip(transforms, self.artifact.bindings)
            ]
            if backend == "eager":
                return _EagerBound(transforms, counts)
            if backend == "compiled":
                rule = ModelRule(transforms, counts, fused=True)
                return torch.compile(rule, fullgraph=True, options=dict(INDUCTOR_OPTIONS))
            return self.artifact.runner(backend)
        if backend == "eager":
            return transforms[0].update
        if backend == "compiled":
            # Dynamic sizes: the same two or three graphs (matrices, small vectors, large
            # vectors) serve every parameter, so compile time does not grow with the model.
            in_graph = self.state_dtype if self.state_dtype != self.artifact.dtype else None
            return CompiledTensorRule(transforms[0], state_dtype=in_graph)
        return self.artifact.runner(backend)

    # -- the step ---------------------------------------------------------------------------

    def _init_state(self, index: int, param: Tensor) -> Dict[str, Tensor]:
        transform = self._transforms[index if self.artifact.kind == "bound" else 0]
        dtype = self.artifact.dtype
        with torch.no_grad():
            values = transform.init_state(param.detach().to(dtype))
            values = [v.to(self.state_dtype) if v.is_floating_point() else v for v in values]
        names = transform.state_names() or [f"state_{j}" for j in range(len(values))]
        state = {"step": torch.zeros((), dtype=torch.int64)}
        state.update(zip(names, values))
        return state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One update of every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat = [p for group in self.param_groups for p in group["params"]]
        names = [n for n, _ in self._named()]
        position = {id(p): i for i, p in enumerate(flat)}
        active_groups = []
        for group in self.param_groups:
            members = [p for p in group["params"] if p.grad is not None]
            for p in members:
                if p.grad.is_sparse:
                    raise RuntimeError(
                        f"FrozenOptimizer does not support sparse gradients "
                        f"(parameter {names[position[id(p)]]})"
                    )
            finite = all(bool(torch.isfinite(p.grad).all()) for p in members)
            if not finite:
                bad = next(p for p in members if not bool(torch.isfinite(p.grad).all()))
                if self.nonfinite == "raise":
                    raise FloatingPointError(
                        f"non-finite gradient for parameter {names[position[id(bad)]]}"
                    )
                self.skipped_steps += 1
                continue
            active_groups.append((group, members))
        active = [p for _, members in active_groups for p in members]
        if not active:
            return loss
        indices = [position[id(p)] for p in active]
        for i, p in zip(indices, active):
            if not self.state[p]:
                self.state[p] = self._init_state(i, p)
        directions = self._directions(flat, active, indices)
        for group, members in active_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in members:
                if decay:
                    p.mul_(1.0 - lr * decay)
                p.add_(directions[id(p)].to(p.dtype), alpha=-lr)
        return loss

    def _state_values(self, p: Tensor, stored: bool = False) -> List[Tensor]:
        """``p``'s state tensors, in the compute dtype (or as ``stored``)."""
        values = [v for k, v in self.state[p].items() if k != "step"]
        if stored or self.state_dtype == self.artifact.dtype:
            return values
        dtype = self.artifact.dtype
        return [v.to(dtype) if v.is_floating_point() else v for v in values]

    def _seed(self, index: int, p: Tensor) -> Tensor:
        """The rounding seed of parameter ``index`` at its current step (see rounding.py)."""
        return self.state[p]["step"] * 1_000_003 + index * 7_919

    def _store(self, p: Tensor, values: List[Tensor], seed: Tensor) -> None:
        state = self.state[p]
        keys = [k for k in state if k != "step"]
        for key, value in zip(keys, round_state(values, self.state_dtype, seed)):
            state[key] = value
        state["step"] = state["step"] + 1

    def _directions(self, flat: List[Tensor], active: List[Tensor], indices: List[int]):
        dtype = self.artifact.dtype
        out: Dict[int, Tensor] = {}
        if self.artifact.kind == "shape_agnostic":
            in_graph = isinstance(self._run, CompiledTensorRule) and self._run.state_dtype
            for i, p in zip(indices, active):
                grad, param, step = p.grad.to(dtype), p.detach().to(dtype), self.state[p]["step"]
                seed = self._seed(i, p)
                if in_graph:  # the compiled graph converts and rounds the state itself
                    state = self._state_values(p, stored=True)
                    direction, values = self._run(grad, param, state, step, seed)
                else:
                    direction, values = self._run(grad, param, self._state_values(p), step)
                out[id(p)] = direction
                self._store(p, list(values), seed)
            return out
        # A bound rule updates every parameter at once with one step count; parameters whose
        # counts differ (some missed steps) are computed in separate calls.
        by_step: Dict[int, List[Tensor]] = {}
        for p in active:
            by_step.setdefault(int(self.state[p]["step"]), []).append(p)
        for step, members in by_step.items():
            grads, params, states, counts = [], [], [], []
            for i, p in enumerate(flat):
                # Parameters outside this call still feed the graph (a zero gradient and their
                # state, or a throw-away initial state); their results are discarded.
                known = p in self.state and self.state[p]
                if known:
                    values = self._state_values(p)
                else:
                    initial = list(self._init_state(i, p).values())[1:]
                    values = [v.to(dtype) if v.is_floating_point() else v for v in initial]
                grad = p.grad if p.grad is not None else torch.zeros_like(p)
                grads.append(grad.to(dtype))
                params.append(p.detach().to(dtype))
                states.extend(values)
                counts.append(len(values))
            directions, new_states = self._run(grads, params, states, torch.tensor(step))
            offset = 0
            member_ids = {id(p) for p in members}
            for i, (p, direction, count) in enumerate(zip(flat, directions, counts)):
                if id(p) in member_ids:
                    out[id(p)] = direction
                    self._store(p, list(new_states[offset : offset + count]), self._seed(i, p))
                offset += count
        return out

    # -- state_dict -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's loader, except that state keeps its storage dtype (``state_dtype``,
        not the parameter's), so a bf16 model's float32 state survives a save/load exactly."""
        super().load_state_dict(state_dict)
        flat = [p for group in self.param_groups for p in group["params"]]
        for index, saved in state_dict["state"].items():
            param = flat[int(index)]
            for key, value in saved.items():
                if key != "step" and isinstance(value, Tensor):
                    self.state[param][key] = value.to(device=param.device, dtype=self.state_dtype)


class _EagerBound:
    """The eager reference of a bound rule: one transform call per parameter."""

    def __init__(self, transforms, counts) -> None:
        self.transforms = transforms
        self.counts = counts

    def __call__(self, grads, params, states, step):
        directions, new_states, offset = [], [], 0
        for transform, grad, param, count in zip(self.transforms, grads, params, self.counts):
            direction, state = transform.update(grad, param, states[offset : offset + count], step)
            directions.append(direction)
            new_states.extend(state)
            offset += count
        return directions, new_states
