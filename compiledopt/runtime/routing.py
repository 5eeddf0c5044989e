"""Which rule computes each parameter's step, and the strategy that runs each rule.

A :class:`Router` belongs to one optimizer. It holds the artifact's transforms and routes (the
rule of each parameter role, see :mod:`compiledopt.roles`), resolves every parameter's
rule from its param group, and keeps one :class:`~compiledopt.runtime.strategies.Strategy` per
rule, built at the rule's first use (rules whose transform is the artifact's own, as configured,
share one). A step computes each rule's parameters in one call of its strategy, so each rule
still batches its parameters.
"""

from typing import Any, Dict, FrozenSet, List, Mapping, Sequence, Tuple

import torch

from compiledopt.export import Artifact
from compiledopt.roles import AUTO, check_role, check_routes, shape_role
from compiledopt.runtime.backends import BUILT_IN_BACKENDS
from compiledopt.runtime.strategies import Computed, Strategy, make_strategy
from compiledopt.transforms.base import Transform

__all__ = ["Router"]


class Router:
    """The rules of an artifact's transform and the strategies computing them.

    Args:
        artifact (Artifact): the verified artifact.
        transforms (list of Transform): its eager transforms.
        state_dtype (torch.dtype): storage dtype of the state.
    """

    def __init__(
        self, artifact: Artifact, transforms: List[Transform], state_dtype: torch.dtype
    ) -> None:
        self.artifact = artifact
        self.transforms = transforms
        self.state_dtype = state_dtype
        self.backend = ""
        self.background = False
        where = f"{artifact.path}: routes"
        self.routes = check_routes(artifact.manifest.get("routes", {}), self.rules(), where)
        self._strategies: Dict[str, Strategy] = {}
        self.unbound: FrozenSet[int] = frozenset()

    def leave_out(self, params: Sequence[torch.Tensor]) -> List[int]:
        """The indices of ``params`` (every parameter of the optimizer, in order) that a bound
        artifact binds, in order: all of them where it binds a zero-element parameter (a
        per-element family), else every parameter with elements. The zero-element ones left
        out (:attr:`unbound`) step without its rule, as a shape-agnostic rule steps them."""
        binds_empty = any(0 in b["shape"] for b in self.artifact.bindings)
        empty = {i for i, p in enumerate(params) if p.numel() == 0 and not binds_empty}
        self.unbound = frozenset(empty)
        self._strategies = {}
        return [i for i in range(len(params)) if i not in empty]

    def check_params(self, params: Sequence[torch.Tensor]) -> None:
        """``ValueError`` unless a bound artifact still has one parameter of ``params`` (every
        parameter of the optimizer) for each of its bindings (it takes no new param group, but
        ``param_groups`` can be edited by hand)."""
        bound = len(params) - len(self.unbound)
        if self.artifact.kind == "bound" and bound != len(self.artifact.bindings):
            raise ValueError(
                f"{self.artifact.path} is bound to {len(self.artifact.bindings)} parameters; the "
                f"param groups now list {bound} (were parameters added or removed by hand?)"
            )

    def rules(self) -> Tuple[str, ...]:
        """The rules the artifact's transform can be routed to."""
        return self.transforms[0].rules()

    def check_group(self, role: Any, rule: Any, where: str = "param group") -> None:
        """``ValueError`` unless ``role`` is a role or ``"auto"`` and ``rule`` is ``None`` or one
        of the transform's rules (a bound artifact takes neither: one rule per binding)."""
        check_role(role, f"role in a {where}")
        if rule is not None and (not isinstance(rule, str) or rule not in self.rules()):
            raise ValueError(f"Invalid rule in a {where}: {rule!r} (None or one of {self.rules()})")
        if self.artifact.kind == "bound" and (role != AUTO or rule not in (None, "artifact")):
            raise ValueError(
                f"{self.artifact.path} is a bound artifact (one rule per binding): a {where} "
                f"cannot set role {role!r} or rule {rule!r}"
            )

    def rules_of(self, groups: Sequence[Mapping[str, Any]]) -> List[str]:
        """The rule of every parameter of ``groups``, in order: its group's ``rule`` if set,
        else the route of its group's ``role`` (with ``"auto"``, ``matrix`` for rank ≥ 2 and
        ``vector`` below)."""
        rules = []
        for group in groups:
            role, rule = group.get("role", AUTO), group.get("rule")
            if rule is None and role != AUTO:  # a role set in the group after it was checked
                check_role(role, "role in a param group")
            for param in group["params"]:
                if rule is not None:
                    rules.append(rule)
                else:
                    rules.append(self.routes[shape_role(param) if role == AUTO else role])
        return rules

    def off_graph(self, groups: Sequence[Mapping[str, Any]]) -> List[str]:
        """The rules ``groups`` use that differ from the transform as configured: the exported
        graphs compute only that."""
        base = self.transforms[0]
        used = set(self.rules_of(groups)) - {"artifact"}
        return sorted(r for r in used if base.routed(r) is not base)

    def check_runs(self, groups: Sequence[Mapping[str, Any]]) -> None:
        """``ValueError`` unless the bound backend computes every rule ``groups`` use (the
        exported graphs compute only the transform as configured); nothing is checked before a
        backend is bound (the backend is chosen for the groups then)."""
        if self.backend:
            for rule in sorted(set(self.rules_of(groups))):
                self._routed(rule)

    def bind(self, backend: str, background: bool = False) -> None:
        """Compute on ``backend`` from now on (strategies are built again at first use); with
        ``background``, a compiled rule compiles in the background while the eager one runs."""
        self.backend = backend
        self.background = background
        self._strategies = {}

    def _routed(self, rule: str) -> Transform:
        base = self.transforms[0]
        transform = base if rule == "artifact" else base.routed(rule)
        if transform is not base and self.backend not in BUILT_IN_BACKENDS:
            raise ValueError(
                f"the {self.backend} backend runs the graphs {self.artifact.path} exported, which "
                f"compute its rule as configured, not the rule {rule!r} some parameters are "
                "routed to: use backend 'compiled' or 'eager', or set rule='artifact' on their "
                "param groups"
            )
        return transform

    def strategy(self, rule: str) -> Strategy:
        """The strategy computing ``rule`` on the bound backend, built at its first use."""
        strategy = self._strategies.get(rule)
        if strategy is None:
            transform = self._routed(rule)
            if transform is self.transforms[0]:
                strategy = self._strategies.get("artifact")
                if strategy is None:
                    strategy = self._make(self.transforms)
                    self._strategies["artifact"] = strategy
            else:
                strategy = self._make([transform])
            self._strategies[rule] = strategy
        return strategy

    def _make(self, transforms: List[Transform]) -> Strategy:
        return make_strategy(
            self.artifact, self.backend, self.state_dtype, transforms, self.background, self.unbound
        )

    def compute(self, groups, flat, active, states, labels) -> Computed:
        """Every active parameter's direction and new state, each by the strategy of its rule
        (see :meth:`Strategy.compute <compiledopt.runtime.strategies.Strategy.compute>`)."""
        rules = self.rules_of(groups)
        parts: Dict[int, Tuple[Strategy, List[int]]] = {}
        for i in active:
            strategy = self.strategy(rules[i])
            parts.setdefault(id(strategy), (strategy, []))[1].append(i)
        if len(parts) == 1:
            strategy, members = next(iter(parts.values()))
            return strategy.compute(flat, members, states, labels)
        computed = Computed({}, [], [])
        for strategy, members in parts.values():
            computed.extend(strategy.compute(flat, members, states, labels))
        return computed
