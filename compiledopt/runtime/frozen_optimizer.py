"""FrozenOptimizer: apply an exported learned optimizer in any training loop."""

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from compiledopt._validation import check_real
from compiledopt.export import BACKENDS, Artifact, ArtifactError, load_artifact
from compiledopt.export.backend import get as export_backend
from compiledopt.pretrained import resolve as resolve_artifact
from compiledopt.runtime.rounding import STATE_DTYPES
from compiledopt.runtime.strategies import make_strategy

logger = logging.getLogger("compiledopt")

#: Backends that need no graph in the artifact: the transform rebuilt from its weights, eagerly
#: or compiled by ``torch.compile``.
BUILT_IN_BACKENDS = ("eager", "compiled")
RUNTIME_BACKENDS = (*BUILT_IN_BACKENDS, *BACKENDS)
# "auto" takes the first available, fastest first (measured on CPU for per-coordinate rules:
# AOTInductor ≈ compiled ≫ ONNX Runtime > TorchScript; eager always works). Artifact backends not
# listed here come after these, in registration order.
AUTO_PREFERENCE = ("aoti", "compiled", "onnx", "torchscript")
NONFINITE_POLICIES = ("skip", "raise")


def auto_order() -> Tuple[str, ...]:
    """The order in which ``backend="auto"`` tries the runtime backends."""
    preferred = [b for b in AUTO_PREFERENCE if b in RUNTIME_BACKENDS]
    rest = [b for b in RUNTIME_BACKENDS if b not in preferred and b != "eager"]
    return (*preferred, *rest, "eager")


class FrozenOptimizer(Optimizer):
    r"""A ``torch.optim.Optimizer`` whose update rule is a frozen, exported learned optimizer.

    Each step computes, for every parameter ``p`` with a gradient ``g``, the artifact's direction
    ``d = T(g, p, state, step)`` and applies ``p ← p − lr · wd · p − lr · d`` (decoupled weight
    decay ``wd``), carrying the rule's state in ``optimizer.state[p]``.

    Args:
        params (iterable): tensors, ``(name, tensor)`` pairs (``model.named_parameters()``), or
            param-group dicts (each may set ``lr`` and ``weight_decay``).
        artifact (str, PathLike or Artifact): an artifact directory (see
            ``docs/artifact-format.md``), or the name of an optimizer packaged with compiledopt
            (``compiledopt.pretrained.names()``; an existing path of that name comes first).
            A ``bound`` artifact binds to the parameters by name
            (when named) and shape, in order, and refuses a mismatch naming the parameter; a
            ``shape_agnostic`` one applies to any parameters.
        lr (float, optional): learning rate (default: the artifact's ``lr``).
        backend (str, optional): ``"eager"`` (the transform rebuilt from the weights),
            ``"compiled"`` (``torch.compile`` of the frozen rule), ``"torchscript"``, ``"onnx"``
            (ONNX Runtime), ``"aoti"`` (AOTInductor), or ``"auto"``: the first available in
            :func:`auto_order` (``aoti, compiled, onnx, torchscript, eager``) whose graphs can
            run on this machine; ``optimizer.backend`` says which.
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
        >>> optimizer = FrozenOptimizer(model.parameters(), "normalized-mlp")  # packaged default
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
        if not isinstance(artifact, Artifact):
            artifact = load_artifact(resolve_artifact(artifact))
        self.artifact = artifact
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
        transforms = self.artifact.transforms()
        if self.artifact.kind == "bound":
            named = all(group.get("param_names") for group in self.param_groups)
            self.artifact.check_bindings(self._named(), check_dtype=False, check_names=named)
        self.backend = self._choose(backend)
        self._strategy = make_strategy(self.artifact, self.backend, self.state_dtype, transforms)
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
        available = set(self.artifact.backends) | set(BUILT_IN_BACKENDS)
        if backend == "auto":  # eager, last, always runs
            return next(
                b
                for b in auto_order()
                if b in BUILT_IN_BACKENDS or (b in available and self._runs_here(b))
            )
        if backend not in available:
            raise ArtifactError(
                f"{self.artifact.path} has no {backend} graph (it has {self.artifact.backends})"
            )
        return backend

    def _runs_here(self, backend: str) -> bool:
        """Whether ``backend``'s graphs can be loaded and run on this machine (``auto`` skips,
        with a log line, those that cannot: a missing package, native code for another CPU)."""
        try:
            export_backend(backend).require(loading=True)
            self.artifact.check_runnable(backend)
        except (ImportError, ArtifactError) as error:
            logger.info("FrozenOptimizer: auto skips the %s backend: %s", backend, error)
            return False
        return True

    # -- the step ---------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Tensor]] = None) -> Optional[Tensor]:
        """One update of every parameter that has a gradient; returns the closure's loss.

        Every direction and new state is computed before any parameter or state is written.
        """
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
        active = [position[id(p)] for _, members in active_groups for p in members]
        if not active:
            return loss
        states = [self.state[p] if p in self.state else {} for p in flat]
        for i in active:
            if not states[i]:
                states[i] = self._strategy.initial_state(i, flat[i])
        results = self._strategy.compute(flat, active, states)
        for group, members in active_groups:
            lr, decay = group["lr"], group["weight_decay"]
            for p in members:
                direction, new_state = results[position[id(p)]]
                self.state[p].update(new_state)  # in place, as torch.optim does
                if decay:
                    p.mul_(1.0 - lr * decay)
                p.add_(direction.to(p.dtype), alpha=-lr)
        return loss

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
