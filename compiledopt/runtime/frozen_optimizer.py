"""FrozenOptimizer: apply an exported learned optimizer in any training loop."""

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

from compiledopt._validation import check_flag, check_real
from compiledopt.export import BACKENDS, Artifact, ArtifactError
from compiledopt.export.backend import get as export_backend
from compiledopt.pretrained import open_artifact
from compiledopt.runtime.autotune import measured_order
from compiledopt.runtime.distributed import finite_flags, place_like
from compiledopt.runtime.placement import placement_problem
from compiledopt.runtime.roles import AUTO, check_role, check_routes, shape_role
from compiledopt.runtime.rounding import STATE_DTYPES
from compiledopt.runtime.state import (
    check_current,
    check_loaded,
    check_lr,
    check_rates,
    check_steps,
    skip_count,
)
from compiledopt.runtime.strategies import Computed, Strategy, make_strategy
from compiledopt.transforms.base import Transform

logger = logging.getLogger("compiledopt")

#: Backends that need no graph in the artifact: the transform rebuilt from its weights, eagerly
#: or compiled by ``torch.compile``.
BUILT_IN_BACKENDS = ("eager", "compiled")
RUNTIME_BACKENDS = (*BUILT_IN_BACKENDS, *BACKENDS)
NONFINITE_POLICIES = ("skip", "raise", "ignore")
#: What pickling and ``copy.deepcopy`` keep besides torch.optim's ``defaults``, ``state`` and
#: ``param_groups`` (the strategy is rebuilt from them; the skipped-step counts are in the
#: groups).
PICKLED = ("artifact", "backend", "nonfinite", "state_dtype")
SET_OF_PARAMS = (
    "optimizer parameters need to be organized in ordered collections, but the ordering of "
    "tensors in sets will change between runs. Please use a list instead."
)


def auto_order(artifact: Artifact, device: torch.device) -> Tuple[str, ...]:
    """The order in which ``backend="auto"`` tries the runtime backends for ``artifact`` on
    ``device`` with the current thread count: fastest first as measured by
    :func:`~compiledopt.runtime.autotune.measure_backends` (else its default order), then any
    other artifact backend, ``eager`` last."""
    order = [b for b in measured_order(artifact, device) if b in RUNTIME_BACKENDS and b != "eager"]
    rest = [b for b in RUNTIME_BACKENDS if b not in order and b != "eager"]
    return (*order, *rest, "eager")


def _mark(param: Tensor, state: Mapping[str, Any]) -> Tuple:
    """What identifies a state as the one a step wrote: the parameter's shape and the identity
    of every state entry. A replaced or added entry, a resized parameter or a state loaded since
    no longer matches, and is checked again before the next step."""
    return (param.shape, tuple(map(id, state.values())))


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
            A path is opened with ``trust_code`` and ``trusted_keys``; a packaged optimizer is
            always trusted (it ships with the installed code).
        lr (float or Tensor, optional): learning rate, a number or a 1-element tensor (kept as
            a tensor in the param groups, as torch.optim does). (default: the artifact's ``lr``)
        backend (str, optional): ``"eager"`` (the transform rebuilt from the weights),
            ``"compiled"`` (``torch.compile`` of the frozen rule), ``"torchscript"``, ``"onnx"``
            (ONNX Runtime), ``"aoti"`` (AOTInductor), or ``"auto"``: the first in
            :func:`auto_order` that the artifact may load (graphs that are code, TorchScript
            and AOTInductor, only from a trusted artifact) and that can run here: on this
            machine, and where the parameters live. The order is the fastest first as
            measured on this machine, device and thread count by
            :func:`compiledopt.runtime.autotune.measure_backends` (recorded in a cache), else
            ``compiled, aoti, onnx, torchscript``; ``eager`` always runs and comes last.
            ``optimizer.backend`` says which. Eager and compiled run on the parameters'
            device (CPU, CUDA, ...); the exported graphs run on the CPU; a distributed
            (``DTensor``, FSDP2) parameter runs on eager; another choice raises ``ValueError``
            at construction. Naming ``torchscript`` or ``aoti`` for an untrusted artifact
            raises ``UntrustedCodeError``. (default: "auto")
        weight_decay (float, optional): decoupled weight decay. (default: 0.0)
        nonfinite (str, optional): when a group has a NaN or infinite gradient, or the rule
            returns a NaN or infinite direction or new state for one of its parameters,
            ``"skip"`` the step for that group (its parameters and state stay as they are;
            counted in the group's ``skipped_steps``, which ``state_dict`` saves, and in
            ``optimizer.skipped_steps``, their sum; the first skip is logged at WARNING, later
            ones at DEBUG) or ``"raise"`` ``FloatingPointError`` naming
            the parameter, before any parameter or state is written: either costs one host
            synchronisation per step (the flags of the whole step read at once). ``"ignore"``
            checks nothing and never synchronises (on a GPU the step is queued without
            waiting): non-finite values are written as computed, as torch.optim's optimizers
            do. (default: "skip")
        state_dtype (torch.dtype, optional): storage dtype of the rule's state. ``None`` keeps
            the artifact's dtype; ``torch.bfloat16`` halves the state's memory (CoordinateMLP:
            2 instead of 4 floats per parameter): the rule still computes in the artifact's
            dtype and the new state is stochastically rounded to bfloat16 (unbiased, so slow
            accumulators such as a 0.999-decay second moment keep tracking; see
            ``compiledopt.runtime.rounding``). On the ``compiled`` backend the conversions and the
            rounding run inside the compiled graph. (default: None)
        trust_code (bool, keyword-only): trust the artifact to run code: allows its TorchScript
            and AOTInductor graphs. Only for artifacts from a source you trust; an ``Artifact``
            given with ``trust_code=True`` is used as :meth:`Artifact.trusting`. (default: False)
        trusted_keys (list, keyword-only): Ed25519 public keys (PEM paths or bytes); an artifact
            path must then carry a valid signature by one of them, which trusts its code (see
            :func:`compiledopt.export.load_artifact`). Not for an ``Artifact`` already loaded.
            (default: None)

    A step is all or nothing: every direction and new state is computed and checked (shapes,
    dtypes, finiteness, a learning rate the parameter's dtype can hold) before any parameter or
    state is written, so a step that raises leaves the optimizer and the model as they were.
    ``load_state_dict`` checks the loaded state against the rule (its keys, shapes and dtypes,
    the step counts) and refuses another optimizer's. ``copy.deepcopy`` and pickling give a
    working optimizer (the artifact's files are read and verified again).

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
        lr: "float | Tensor | None" = None,
        backend: str = "auto",
        weight_decay: float = 0.0,
        nonfinite: str = "skip",
        state_dtype: Optional[torch.dtype] = None,
        *,
        trust_code: bool = False,
        trusted_keys: Optional[Sequence["str | os.PathLike | bytes"]] = None,
    ) -> None:
        check_flag(trust_code, "trust_code")
        if isinstance(params, set):
            raise TypeError(SET_OF_PARAMS)
        if isinstance(artifact, Artifact):
            if trusted_keys is not None:
                raise ValueError(
                    "trusted_keys checks an artifact's signature when it is opened: pass the "
                    "artifact's path, or load it with load_artifact(path, trusted_keys=...)"
                )
            self.artifact = artifact.trusting() if trust_code else artifact
        else:
            self.artifact = open_artifact(
                artifact, trust_code=trust_code, trusted_keys=trusted_keys
            )
        if state_dtype is not None and state_dtype not in (self.artifact.dtype, *STATE_DTYPES):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None, the artifact's "
                f"{self.artifact.dtype}, or one of {STATE_DTYPES})"
            )
        self.state_dtype = self.artifact.dtype if state_dtype is None else state_dtype
        lr = float(self.artifact.manifest["lr"]) if lr is None else lr
        check_lr(lr)
        check_real(weight_decay, "weight_decay", 0.0)
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (one of {NONFINITE_POLICIES})")
        if backend != "auto" and backend not in RUNTIME_BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (one of {('auto', *RUNTIME_BACKENDS)})")
        self.nonfinite = nonfinite
        self._warned_skip = False  # the first skipped step is logged at WARNING
        # Per parameter, the state the last step wrote (see _mark): not checked again.
        self._written: Dict[int, Tuple] = {}
        self._initialised = False
        transforms = self.artifact.transforms()
        self._transforms = transforms
        self.routes = self._artifact_routes()
        super().__init__(
            params, {"lr": lr, "weight_decay": weight_decay, "role": AUTO, "rule": None}
        )
        if self.artifact.kind == "bound":
            named = all(group.get("param_names") for group in self.param_groups)
            self.artifact.check_bindings(self._named(), check_dtype=False, check_names=named)
        self.backend = self._choose(backend)
        self._strategies: Dict[str, Strategy] = {}
        self._strategy = self._strategy_for("artifact")
        self._initialised = True
        logger.info(
            "FrozenOptimizer: %s artifact %s on the %s backend",
            self.artifact.kind,
            self.artifact.path,
            self.backend,
        )

    @property
    def skipped_steps(self) -> int:
        """How many group steps were skipped for non-finite values (``nonfinite="skip"``): the
        sum of the param groups' ``skipped_steps``, which ``state_dict`` saves and
        ``load_state_dict`` restores (0 for a state_dict saved without them)."""
        return sum(group.get("skipped_steps", 0) for group in self.param_groups)

    # -- construction -----------------------------------------------------------------------

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        if getattr(self, "_initialised", False) and self.artifact.kind == "bound":
            raise ValueError(
                f"{self.artifact.path} is bound to {len(self.artifact.bindings)} parameters; "
                "a bound artifact cannot take another parameter group"
            )
        if not isinstance(param_group, dict):
            raise TypeError(f"param_group must be a dict, but got {type(param_group)}")
        if "lr" in param_group:
            check_lr(param_group["lr"])
        if "weight_decay" in param_group:
            check_real(param_group["weight_decay"], "weight_decay", 0.0)
        self._check_routing(param_group.get("role", AUTO), param_group.get("rule"))
        param_group["skipped_steps"] = skip_count(param_group.get("skipped_steps", 0), "a group")
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError(SET_OF_PARAMS)
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

    def _flat(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    # -- roles and rules --------------------------------------------------------------------

    def _artifact_routes(self) -> Dict[str, str]:
        """The artifact's rule for every role (its manifest's ``routes``; ``"artifact"`` for a
        role it leaves out, and for every role of an artifact without routes)."""
        routes = self.artifact.manifest.get("routes", {})
        return check_routes(routes, self._transforms[0].rules(), f"{self.artifact.path}: routes")

    def _check_routing(self, role: Any, rule: Any, where: str = "param group") -> None:
        """``ValueError`` unless ``role`` is a role or ``"auto"`` and ``rule`` is ``None`` or one
        of the transform's rules (a bound artifact takes neither: one rule per binding)."""
        check_role(role, f"role in a {where}")
        rules = self._transforms[0].rules()
        if rule is not None and (not isinstance(rule, str) or rule not in rules):
            raise ValueError(f"Invalid rule in a {where}: {rule!r} (None or one of {rules})")
        if self.artifact.kind == "bound" and (role != AUTO or rule not in (None, "artifact")):
            raise ValueError(
                f"{self.artifact.path} is a bound artifact (one rule per binding): a {where} "
                f"cannot set role {role!r} or rule {rule!r}"
            )

    def rules_of(self) -> List[str]:
        """The rule each parameter steps with, in ``state_dict()`` order: its group's ``rule``
        if set, else the artifact's route for its role (the group's ``role``; with ``"auto"``,
        ``matrix`` for rank ≥ 2 and ``vector`` below)."""
        rules = []
        for group in self.param_groups:
            role, rule = group.get("role", AUTO), group.get("rule")
            for param in group["params"]:
                if rule is not None:
                    rules.append(rule)
                else:
                    rules.append(self.routes[shape_role(param) if role == AUTO else role])
        return rules

    def _routed(self, rule: str) -> Transform:
        """The artifact's transform for ``rule``; ``ValueError`` where an exported backend runs
        graphs that cannot compute it."""
        transform = self._transforms[0] if rule == "artifact" else self._transforms[0].routed(rule)
        if transform is not self._transforms[0] and self.backend not in BUILT_IN_BACKENDS:
            raise ValueError(
                f"the {self.backend} backend runs the graphs {self.artifact.path} exported, which "
                f"compute its rule as configured, not the rule {rule!r} some parameters are "
                "routed to: use backend 'compiled' or 'eager', or set rule='artifact' on their "
                "param groups"
            )
        return transform

    def _strategy_for(self, rule: str) -> Strategy:
        """The strategy computing ``rule``, built at its first use; rules whose transform is the
        artifact's own (as configured) share one strategy."""
        strategy = self._strategies.get(rule)
        if strategy is None:
            transform = self._routed(rule)
            if transform is self._transforms[0]:
                strategy = self._strategies.get("artifact")
                if strategy is None:
                    strategy = make_strategy(
                        self.artifact, self.backend, self.state_dtype, self._transforms
                    )
                    self._strategies["artifact"] = strategy
            else:
                strategy = make_strategy(self.artifact, self.backend, self.state_dtype, [transform])
            self._strategies[rule] = strategy
        return strategy

    def _compute(self, flat, active, states, labels) -> Computed:
        """Every active parameter's direction and new state, each by the strategy of its rule
        (one call per rule, so each rule still batches its parameters)."""
        rules = self.rules_of()
        parts: Dict[int, Tuple[Strategy, List[int]]] = {}
        for i in active:
            strategy = self._strategy_for(rules[i])
            parts.setdefault(id(strategy), (strategy, []))[1].append(i)
        computed = Computed({}, [])
        for strategy, members in parts.values():
            part = strategy.compute(flat, members, states, labels)
            computed.results.update(part.results)
            computed.checks.extend(part.checks)
        return computed

    def _named(self) -> List[Tuple[str, Tensor]]:
        named = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for i, (param, name) in enumerate(zip(group["params"], names)):
                named.append((name if name is not None else f"params[{i}]", param))
        return named

    def _labels(self) -> List[str]:
        """How messages name each parameter: ``parameter <name>``, or ``parameter <index>``
        (its index in ``state_dict()``) when unnamed."""
        labels = []
        for group in self.param_groups:
            names = group.get("param_names") or [None] * len(group["params"])
            for name in names:
                labels.append(f"parameter {name if name is not None else len(labels)}")
        return labels

    def _choose(self, backend: str) -> str:
        available = set(self.artifact.backends) | set(BUILT_IN_BACKENDS)
        if backend == "auto":  # eager, last, always runs
            return next(
                b
                for b in auto_order(self.artifact, self._device())
                if b == "eager"
                or (
                    (b in BUILT_IN_BACKENDS or (b in available and self._may_load(b)))
                    and self._placed(b)
                    and (
                        b in BUILT_IN_BACKENDS or (self._computes_routes(b) and self._runs_here(b))
                    )
                )
            )
        if backend not in available:
            raise ArtifactError(
                f"{self.artifact.path} has no {backend} graph (it has {self.artifact.backends})"
            )
        problem = placement_problem(self._named(), backend, self.artifact)
        if problem:
            raise ValueError(problem)
        if backend not in BUILT_IN_BACKENDS:
            self.artifact.check_may_load(backend)
            routed = self._routed_rules()
            if routed:
                raise ValueError(
                    f"the {backend} backend runs the graphs {self.artifact.path} exported, which "
                    f"compute its rule as configured, not the rules {routed} that some "
                    "parameters are routed to: use backend 'compiled' or 'eager', or set "
                    "rule='artifact' on their param groups"
                )
        return backend

    def _routed_rules(self) -> List[str]:
        """The rules the param groups route parameters to that differ from the artifact's
        transform as configured (its exported graphs compute only that)."""
        base = self._transforms[0]
        used = set(self.rules_of()) - {"artifact"}
        return sorted(r for r in used if base.routed(r) is not base)

    def _computes_routes(self, backend: str) -> bool:
        """Whether an exported backend's graphs compute every rule the parameters are routed to
        (``auto`` skips, with a log line, one that does not)."""
        routed = self._routed_rules()
        if routed:
            logger.info(
                "FrozenOptimizer: auto skips the %s backend: its graphs do not compute the rules "
                "%s that some parameters are routed to",
                backend,
                routed,
            )
        return not routed

    def _device(self) -> torch.device:
        """The device of the first parameter (``auto`` orders the backends for it)."""
        flat = self._flat()
        return flat[0].device if flat else torch.device("cpu")

    def _placed(self, backend: str) -> bool:
        """Whether ``backend`` can run where the parameters live (``auto`` skips, with a log
        line, those that cannot)."""
        problem = placement_problem(self._named(), backend, self.artifact)
        if problem:
            logger.info("FrozenOptimizer: auto skips the %s backend: %s", backend, problem)
        return problem is None

    def _may_load(self, backend: str) -> bool:
        """Whether the artifact may load ``backend``'s graphs (``auto`` skips, with a log line,
        graphs that are code in an untrusted artifact)."""
        if self.artifact.may_load(backend):
            return True
        logger.info(
            "FrozenOptimizer: auto skips the %s backend: its graphs are code and %s is not "
            "trusted (trust_code=True or trusted_keys)",
            backend,
            self.artifact.path,
        )
        return False

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

        Every direction and new state is computed and checked before any parameter or state is
        written: a step that raises leaves every parameter and every state as it was.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat, labels = self._flat(), self._labels()
        position = {id(p): i for i, p in enumerate(flat)}
        groups = []
        for group in self.param_groups:
            members = [position[id(p)] for p in group["params"] if p.grad is not None]
            for i in members:
                if flat[i].grad.is_sparse:
                    raise RuntimeError(
                        f"FrozenOptimizer does not support sparse gradients ({labels[i]})"
                    )
            if members:
                groups.append((group, members))
        if not groups:
            return loss
        # What the step reads is checked before the rule runs (values set in place included).
        rates = [
            check_rates(group, {flat[i].dtype for i in ms}, f"the group of {labels[ms[0]]}")
            for group, ms in groups
        ]
        active = [i for _, members in groups for i in members]
        states = [self.state[p] if p in self.state else {} for p in flat]
        for i in active:
            states[i] = self._current(i, flat[i], states[i], labels[i])
        check_steps([states[i]["step"] for i in active], [labels[i] for i in active])
        computed = self._compute(flat, active, states, labels)
        skipped = (
            set()
            if self.nonfinite == "ignore"
            else self._nonfinite(groups, computed.checks, labels)
        )
        results = computed.results
        for g, ((group, members), (lr, decay)) in enumerate(zip(groups, rates)):
            if g in skipped:
                group["skipped_steps"] = group.get("skipped_steps", 0) + 1
                continue
            params = [flat[i] for i in members]
            for i, p in zip(members, params):
                state = self.state[p]
                state.update(results[i].state)  # in place, as torch.optim does
                self._written[id(p)] = _mark(p, state)
            if decay:
                torch._foreach_mul_(params, 1.0 - lr * decay)
            directions = [results[i].direction.to(p.dtype) for i, p in zip(members, params)]
            torch._foreach_add_(params, directions, alpha=-lr)
        return loss

    def _current(self, index: int, param: Tensor, state: Dict[str, Any], where: str):
        """The state parameter ``index`` steps from (its initial state before its first step),
        checked against the rule (see :func:`~compiledopt.runtime.state.check_current`)."""
        if not state:
            return self._strategy.initial_state(index, param)
        if self._written.get(id(param)) == _mark(param, state):
            return state  # exactly what the last step wrote: checked then
        return check_current(state, self._strategy.expected_state(index, param), where)

    def _nonfinite(self, groups, checks, labels) -> set:
        """The indices of the groups to skip: those with a non-finite gradient, direction or new
        state (``nonfinite="raise"``: ``FloatingPointError`` naming the first such parameter).
        One host synchronisation for the whole step (and, for distributed parameters, one
        all-reduce of their flags, so that every rank decides alike)."""
        bad: Dict[int, str] = {}
        for (_, members, what), flags in zip(checks, finite_flags(checks)):
            for i, finite in zip(members, flags):
                if not finite:
                    bad.setdefault(i, what)
        skipped = set()
        for g, (_, members) in enumerate(groups):
            first = next((i for i in members if i in bad), None)
            if first is None:
                continue
            if self.nonfinite == "raise":
                raise FloatingPointError(f"non-finite {bad[first]} for {labels[first]}")
            skipped.add(g)
            warn = not getattr(self, "_warned_skip", False)
            self._warned_skip = True
            logger.log(
                logging.WARNING if warn else logging.DEBUG,
                "FrozenOptimizer: step skipped for the group of %s: non-finite %s (counted in "
                "skipped_steps%s)",
                labels[first],
                bad[first],
                "; later skips are logged at DEBUG" if warn else "",
            )
        return skipped

    # -- state_dict -------------------------------------------------------------------------

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """torch.optim's loader (its hooks included), with the loaded state checked against the
        rule and kept in its storage dtype.

        After the registered pre-hooks have run, every parameter's saved state must have exactly
        the keys ``step`` and the rule's state names (another optimizer's state is refused),
        each tensor the shape the rule gives that parameter and a real floating-point dtype,
        and ``step`` an integer ``>= 0``; a state for a parameter the param groups do not list
        is refused too. ``ValueError`` names the parameter and the key, and nothing is loaded.
        Floating-point state is stored in ``state_dtype`` (not the parameter's dtype, as
        torch.optim would: a bf16 model's float32 state survives a save/load exactly), the step
        count as a 0-d int64 tensor; then the registered post-hooks run.
        """
        checked: Dict[int, Dict[str, Tensor]] = {}

        def check(optimizer: Optimizer, loaded: Dict[str, Any]) -> None:
            checked.update(self._checked(loaded))

        def restore(optimizer: Optimizer) -> None:
            self._written.clear()
            for group in self.param_groups:  # a state_dict saved before groups had roles
                group.setdefault("role", AUTO)
                group.setdefault("rule", None)
                group.setdefault("skipped_steps", 0)  # saved before they were counted by group
            flat = self._flat()
            for index, values in checked.items():
                self.state[flat[index]].update(values)

        # Runs after the user's pre-hooks (it sees what they return), and before their
        # post-hooks (what they change stays).
        pre = self.register_load_state_dict_pre_hook(check)
        post = self.register_load_state_dict_post_hook(restore, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _checked(self, loaded: Any) -> Dict[int, Dict[str, Tensor]]:
        """Each saved state of ``loaded`` (a state_dict), checked and converted, by the index of
        its parameter (see :meth:`load_state_dict`)."""
        if not isinstance(loaded, Mapping) or not {"state", "param_groups"} <= set(loaded):
            raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
        saved_groups = loaded["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return {}  # torch.optim refuses it, with its own message
        for g, saved in enumerate(saved_groups):
            for key in ("lr", "weight_decay"):
                if key not in saved:
                    raise ValueError(f"the state_dict's param group {g} has no {key!r}")
            check_lr(saved["lr"])
            check_real(saved["weight_decay"], "weight_decay", 0.0)
            skip_count(saved.get("skipped_steps", 0), f"the state_dict's param group {g}")
            self._check_routing(
                saved.get("role", AUTO), saved.get("rule"), f"state_dict's param group {g}"
            )
        index = {pid: i for i, pid in enumerate(p for s in saved_groups for p in s["params"])}
        flat, labels = self._flat(), self._labels()
        checked = {}
        for pid, saved in loaded["state"].items():
            if pid not in index:
                raise ValueError(
                    f"the state_dict holds a state for parameter {pid!r}, which its param_groups "
                    f"do not list (they list {len(index)} parameters)"
                )
            i = index[pid]
            expected = self._strategy.expected_state(i, flat[i])
            values = check_loaded(saved, expected, labels[i], self.state_dtype, flat[i].device)
            # A whole-tensor state (saved by one process) is sharded like a DTensor parameter.
            checked[i] = {k: place_like(v, flat[i]) for k, v in values.items()}
        return checked

    # -- copy and pickle --------------------------------------------------------------------

    def __getstate__(self) -> Dict[str, Any]:
        state = super().__getstate__()
        state.update({key: self.__dict__[key] for key in PICKLED if key in self.__dict__})
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        super().__setstate__(state)
        # torch.optim's load_state_dict calls this with the state and param groups only; a
        # pickled or copied optimizer comes with its artifact, and its strategy is rebuilt (the
        # artifact's files read and verified again).
        self._written = {}
        if "artifact" in state:
            self._transforms = self.artifact.transforms()
            self.routes = self._artifact_routes()
            self._strategies = {}
            self._strategy = self._strategy_for("artifact")
            self._initialised = True
