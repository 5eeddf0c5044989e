"""FrozenOptimizer: apply an exported learned optimizer in any training loop."""

import logging
import os
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.optim import Optimizer

import compiledopt.runtime.warming as warming
from compiledopt._validation import check_flag
from compiledopt.export import Artifact
from compiledopt.roles import AUTO
from compiledopt.runtime.choice import auto_order, check_backend, choose_backend
from compiledopt.runtime.distributed import place_like
from compiledopt.runtime.keywords import (
    artifact_for,
    backend_for_keywords,
    check_new_group,
    check_own_group,
)
from compiledopt.runtime.loading import check_layout, check_saved_groups
from compiledopt.runtime.params import (
    SET_OF_PARAMS,
    check_listed_once,
    check_stepping,
    checked_params,
    names_of,
)
from compiledopt.runtime.rounding import STATE_DTYPES
from compiledopt.runtime.routing import Router
from compiledopt.runtime.skips import groups_to_skip
from compiledopt.runtime.state import (
    check_current,
    check_loaded,
    check_lr,
    check_rates,
    check_steps,
    group_entry,
    lr_of,
    separate_lrs,
    skip_count,
    written_mark,
)

logger = logging.getLogger("compiledopt")

NONFINITE_POLICIES = ("skip", "raise", "ignore")
#: What pickling and ``copy.deepcopy`` keep besides torch.optim's ``defaults``, ``state`` and
#: ``param_groups`` (the strategy is rebuilt from them; the skipped-step counts are in the
#: groups).
PICKLED = ("artifact", "backend", "background", "nonfinite", "state_dtype")


class FrozenOptimizer(Optimizer):
    r"""A ``torch.optim.Optimizer`` whose update rule is a frozen, exported learned optimizer.

    Each step computes, for every parameter ``p`` with a gradient ``g``, the artifact's direction
    ``d = T(g, p, state, step)`` and applies ``p ← p − lr · wd · p − lr · d`` (decoupled weight
    decay ``wd``), carrying the rule's state in ``optimizer.state[p]``.

    Args:
        params (iterable): tensors, ``(name, tensor)`` pairs (``model.named_parameters()``), or
            param-group dicts (each may set ``lr``, ``weight_decay``, ``maximize``, and ``role``
            and ``rule``: see ``compiledopt.param_groups`` and docs/runtime.md).
        artifact (str, PathLike or Artifact, optional): an artifact directory (see
            ``docs/artifact-format.md``), or the name of an optimizer packaged with compiledopt
            (``compiledopt.pretrained.names()``; an existing path of that name comes first).
            (default: the packaged default, ``compiledopt.pretrained.DEFAULT``)
            A ``bound`` artifact binds to the parameters by name (when named) and shape, in
            order, and refuses a mismatch naming the parameter (zero-element parameters it does
            not bind step as with any rule: count advanced); a ``shape_agnostic`` one applies
            to any parameters.
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
            :func:`compiledopt.runtime.measure.measure_backends` (recorded in a cache), else
            ``compiled, aoti, onnx, torchscript``; ``eager`` always runs and comes last.
            ``optimizer.backend`` says which. When ``auto`` picks ``compiled``, no step waits
            for the compile: it runs in the background and the eager rule computes the steps
            until it is ready (``optimizer.background``; naming ``"compiled"`` compiles at the
            first step instead). Eager and compiled run on the parameters'
            device (CPU, CUDA, ...); the exported graphs run on the CPU; a distributed
            (``DTensor``, FSDP2) parameter runs on eager; another choice raises ``ValueError``
            at construction. Naming ``torchscript`` or ``aoti`` for an untrusted artifact
            raises ``UntrustedCodeError``. (default: "auto")
        weight_decay (float or Tensor, optional): decoupled weight decay, ``p <- p - lr * wd * p``
            (a number or a 1-element tensor, as torch.optim takes it). (default: 0.0, measured:
            1e-3 and 1e-2 tie with 0 on held-out tasks, 0.1 loses ~4%)
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
        maximize, foreach, fused, betas, eps, amsgrad, capturable, differentiable (keyword-only):
            ``torch.optim.AdamW``'s, honoured with its meaning or refused with the reason (see
            :mod:`compiledopt.runtime.keywords`): ``maximize`` ascends; ``fused=True`` asks for
            the ``compiled`` backend; ``betas`` and ``eps`` are the artifact's.
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
        artifact: "str | os.PathLike | Artifact | None" = None,
        lr: "float | Tensor | None" = None,
        backend: str = "auto",
        weight_decay: "float | Tensor" = 0.0,
        nonfinite: str = "skip",
        state_dtype: Optional[torch.dtype] = None,
        *,
        maximize: bool = False,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        betas: Any = None,
        eps: Any = None,
        amsgrad: bool = False,
        capturable: bool = False,
        differentiable: bool = False,
        trust_code: bool = False,
        trusted_keys: Optional[Sequence["str | os.PathLike | bytes"]] = None,
    ) -> None:
        check_flag(trust_code, "trust_code")
        check_flag(maximize, "maximize")
        backend = backend_for_keywords(
            backend,
            betas=betas,
            eps=eps,
            amsgrad=amsgrad,
            foreach=foreach,
            fused=fused,
            capturable=capturable,
            differentiable=differentiable,
        )
        if isinstance(params, set):
            raise TypeError(SET_OF_PARAMS)
        self.artifact = artifact_for(artifact, trust_code, trusted_keys)
        if state_dtype is not None and state_dtype not in (self.artifact.dtype, *STATE_DTYPES):
            raise ValueError(
                f"Invalid state_dtype: {state_dtype!r} (None, the artifact's "
                f"{self.artifact.dtype}, or one of {STATE_DTYPES})"
            )
        self.state_dtype = self.artifact.dtype if state_dtype is None else state_dtype
        lr = float(self.artifact.manifest["lr"]) if lr is None else lr
        check_lr(lr)
        check_lr(weight_decay, "weight_decay")
        if nonfinite not in NONFINITE_POLICIES:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r} (one of {NONFINITE_POLICIES})")
        check_backend(backend)
        self.nonfinite = nonfinite
        self._warned_skip = False  # the first skipped step is logged at WARNING
        # Per parameter, the state the last step wrote (see written_mark): not checked again.
        self._written: Dict[int, Tuple] = {}
        self._initialised = False
        self._router = Router(self.artifact, self.artifact.transforms(), self.state_dtype)
        defaults = {"lr": lr, "weight_decay": weight_decay, "maximize": maximize}
        super().__init__(params, {**defaults, "role": AUTO, "rule": None})
        if self.artifact.kind == "bound":
            named = all(group.get("param_names") for group in self.param_groups)
            pairs = self._named()
            bound = [pairs[i] for i in self._router.leave_out(self._flat())]
            self.artifact.check_bindings(bound, check_dtype=False, check_names=named)
        self.backend = self._choose(backend)
        # A compile the user did not ask for never holds up a step (see runtime.warming).
        self.background = backend == "auto" and self.backend == "compiled"
        self._router.bind(self.backend, self.background)
        self._initialised = True
        why = "chosen by auto" if backend == "auto" else "as asked"
        if self.background:
            why += (
                "; compiled in the background once the eager rule has run as long as its "
                f"compile took here before (at most {warming.PATIENCE_S:g} s)"
            )
        logger.info(
            "FrozenOptimizer: %s artifact %s on the %s backend (%s)",
            *(self.artifact.kind, self.artifact.path, self.backend, why),
        )

    @property
    def routes(self) -> Dict[str, str]:
        """The artifact's rule for every parameter role (its manifest's ``routes``; a role it
        leaves out, or every role of an artifact without routes, runs ``"artifact"``: the
        transform as configured)."""
        return dict(self._router.routes)

    @property
    def _schema_strategy(self):
        """The strategy of the artifact's transform as configured: it gives every parameter's
        state schema (each rule of a transform keeps the same state). Not ``_strategy``:
        Lightning sets an attribute of that name on the optimizers it wraps."""
        return self._router.strategy("artifact")

    def rules_of(self) -> List[str]:
        """The rule each parameter steps with, in ``state_dict()`` order: its group's ``rule``
        if set, else the artifact's route for the group's ``role`` (with ``"auto"``,
        ``matrix`` for rank ≥ 2 and ``vector`` below)."""
        return self._router.rules_of(self.param_groups)

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
        check_new_group(param_group)
        if "lr" in param_group:
            check_lr(param_group["lr"])
        elif any(g["lr"] is self.defaults["lr"] for g in self.param_groups):  # see lr_of
            param_group["lr"] = lr_of(self.defaults["lr"])
        if "weight_decay" in param_group:
            check_lr(param_group["weight_decay"], "weight_decay")
        self._router.check_group(param_group.get("role", AUTO), param_group.get("rule"))
        check_flag(param_group.get("maximize", False), "maximize")
        param_group["skipped_steps"] = skip_count(param_group.get("skipped_steps", 0), "a group")
        param_group["params"] = checked_params(group_entry(param_group, "params", "a param group"))
        tensors = [p[1] if isinstance(p, tuple) else p for p in param_group["params"]]
        self._router.check_runs([{**param_group, "params": tensors}])  # as the constructor does
        super().add_param_group(param_group)

    def _flat(self) -> List[Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

    def _named(self) -> List[Tuple[str, Tensor]]:
        named = []
        for group in self.param_groups:
            names = names_of(group)
            for i, (param, name) in enumerate(zip(group["params"], names)):
                named.append((name if name is not None else f"params[{i}]", param))
        return named

    def _labels(self) -> List[str]:
        """How messages name each parameter: ``parameter <name>``, or ``parameter <index>``
        (its index in ``state_dict()``) when unnamed."""
        labels: List[str] = []
        for group in self.param_groups:
            for name in names_of(group):
                labels.append(f"parameter {name if name is not None else len(labels)}")
        return labels

    def _choose(self, backend: str) -> str:
        flat = self._flat()
        device = flat[0].device if flat else torch.device("cpu")
        elements = sum(p.numel() for p in flat)
        order = auto_order(self.artifact, device, elements) if backend == "auto" else ()
        off_graph = self._router.off_graph(self.param_groups)
        return choose_backend(backend, self.artifact, self._named(), off_graph, order)

    # -- the step ---------------------------------------------------------------------------

    # The closure's loss is a Tensor, not the float of torch.optim.Optimizer.step's overloads.
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Optional[Callable[[], Tensor]] = None
    ) -> Optional[Tensor]:
        """One update of every parameter that has a gradient; returns the closure's loss.

        Every direction and new state is computed and checked before any parameter or state is
        written: a step that raises leaves every parameter and every state as it was.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        flat, labels = self._flat(), self._labels()
        self._router.check_params(flat)
        position = {id(p): i for i, p in enumerate(flat)}
        check_listed_once(flat, labels, len(position))  # param groups may be edited by hand
        groups = []
        for group in self.param_groups:
            members = [position[id(p)] for p in group["params"] if p.grad is not None]
            for i in members:
                check_stepping(flat[i], labels[i])
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
        # maximize: the rule sees the negated gradient (p.grad itself is given back unchanged).
        flipped: List[Tuple[Tensor, Tensor]] = []
        for group, members in groups:
            if group.get("maximize"):
                for i in members:
                    grad = flat[i].grad
                    assert grad is not None  # members are the parameters with a gradient
                    flipped.append((flat[i], grad))
        try:
            for param, grad in flipped:
                param.grad = -grad
            computed = self._router.compute(self.param_groups, flat, active, states, labels)
        finally:
            for param, grad in flipped:
                param.grad = grad
        skipped: set = set()
        if self.nonfinite != "ignore":
            skipped, self._warned_skip = groups_to_skip(
                groups, computed.checks, labels, self.nonfinite, self._warned_skip
            )
        computed.commit({i for g, (_, ms) in enumerate(groups) if g not in skipped for i in ms})
        results = computed.results
        for g, ((group, members), (lr, decay)) in enumerate(zip(groups, rates)):
            if g in skipped:
                group["skipped_steps"] = group.get("skipped_steps", 0) + 1
                continue
            params = [flat[i] for i in members]
            for i, p in zip(members, params):
                state = self.state[p]
                state.update(results[i].state)  # in place, as torch.optim does
                self._written[id(p)] = written_mark(p, state)
            if decay:
                torch._foreach_mul_(params, 1.0 - lr * decay)
            directions = [results[i].direction.to(p.dtype) for i, p in zip(members, params)]
            torch._foreach_add_(params, directions, alpha=-lr)
        return loss

    def _current(self, index: int, param: Tensor, state: Dict[str, Any], where: str):
        """The state parameter ``index`` steps from (its initial state before its first step),
        checked against the rule (see :func:`~compiledopt.runtime.state.check_current`)."""
        if not state:
            return self._schema_strategy.initial_state(index, param)
        if self._written.get(id(param)) == written_mark(param, state):
            return state  # exactly what the last step wrote: checked then
        expected = self._schema_strategy.expected_state(index, param)
        return check_current(state, expected, param.device, where)

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
                group.setdefault("maximize", False)
                group.setdefault("skipped_steps", 0)  # saved before they were counted by group
            separate_lrs(self.param_groups)  # saved sharing one (see lr_of)
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
        check_layout(loaded)
        saved_groups = loaded["param_groups"]
        if len(saved_groups) != len(self.param_groups) or any(
            len(s["params"]) != len(g["params"]) for s, g in zip(saved_groups, self.param_groups)
        ):
            return {}  # torch.optim refuses it, with its own message
        check_saved_groups(saved_groups, self.param_groups, self._router)
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
            expected = self._schema_strategy.expected_state(i, flat[i])
            values = check_loaded(saved, expected, labels[i], self.state_dtype, flat[i].device)
            # A whole-tensor state (saved by one process) is sharded like a DTensor parameter.
            checked[i] = {k: place_like(v, flat[i]) for k, v in values.items()}
        for g, saved in enumerate(saved_groups):  # another optimizer's, with no state to refuse
            check_own_group(saved, f"the state_dict's param group {g}")
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
        self._warned_skip = getattr(self, "_warned_skip", False)
        if "artifact" in state:
            self._router = Router(self.artifact, self.artifact.transforms(), self.state_dtype)
            if self.artifact.kind == "bound":
                self._router.leave_out(self._flat())
            self._router.bind(self.backend, getattr(self, "background", False))
            self._initialised = True


# torch.optim wraps ``step`` in its profiling hooks at the first construction; wrapped here
# instead, inside ``torch.compiler.disable``, so that Dynamo leaves the whole step to Python.
# ``torch.compile(optimizer.step)`` would otherwise retrace it at every new state object (its
# guards cannot hold across steps) until the recompile limit, for nothing: the rule inside
# already runs compiled (or exported).
FrozenOptimizer.step = torch.compiler.disable(  # type: ignore[method-assign]
    Optimizer.profile_hook_step(FrozenOptimizer.step)
)
FrozenOptimizer.step.hooked = True  # type: ignore[attr-defined]
