"""What ``FrozenOptimizer.load_state_dict`` checks of a saved state_dict's param groups before it
loads anything: each group's hyper-parameters, role and rule, as the constructor checks a group
given to it, and that the saved groups list the same parameters, by name, as the optimizer's.

torch.optim matches saved states to parameters by position alone, and a saved group's
``param_names`` replace the optimizer's: a state_dict saved with the parameters in another
order (two of one shape swapped, say) would load each state onto the wrong parameter and
rename the parameters after it, silently. Where both name their parameters, a name the
optimizer has at another position is refused (a ``register_load_state_dict_pre_hook`` can
reorder a state_dict first); names compare without the modules that wrappers insert
(``module.`` of DDP, ``_orig_mod.`` of ``torch.compile``, FSDP's and activation checkpointing's),
and a name the optimizer does not have at all loads by position, as torch.optim loads it (a
model renamed since it was saved).
"""

from collections.abc import Hashable
from typing import Any, Mapping, Sequence

from compiledopt._validation import check_flag
from compiledopt.roles import AUTO
from compiledopt.runtime.routing import Router
from compiledopt.runtime.state import check_lr, group_entry, skip_count

__all__ = ["check_layout", "check_saved_groups", "plain_name"]

#: Module names that wrappers insert into parameter names: DDP's, ``torch.compile``'s, FSDP's
#: and activation checkpointing's.
WRAPPERS = frozenset({"module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def check_layout(loaded: Any) -> None:
    """``ValueError`` naming the entry unless ``loaded`` has an optimizer state_dict's layout: a
    mapping with a ``state`` mapping and ``param_groups``, a list of mappings, each with
    ``params`` a list of parameter ids (and ``param_names``, if any, at most one name per id), which
    torch.optim's loader reads before anything can say what is wrong."""
    if not isinstance(loaded, Mapping) or not {"state", "param_groups"} <= set(loaded):
        raise ValueError("not an optimizer state_dict: it needs 'state' and 'param_groups'")
    if not isinstance(loaded["state"], Mapping):
        raise ValueError(
            f"the state_dict's 'state' must be a dict, got {type(loaded['state']).__name__}"
        )
    groups = loaded["param_groups"]
    if not isinstance(groups, (list, tuple)):
        raise ValueError(
            f"the state_dict's 'param_groups' must be a list, got {type(groups).__name__}"
        )
    for g, group in enumerate(groups):
        where = f"the state_dict's param group {g}"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where} must be a dict, got {type(group).__name__}")
        if not isinstance(group.get("params"), (list, tuple)):
            raise ValueError(
                f"{where} must list its parameter ids in 'params', got {group.get('params')!r}"
            )
        for pid in group["params"]:
            if not isinstance(pid, Hashable):
                raise ValueError(f"{where} lists {pid!r} as a parameter id")
        names = group.get("param_names")
        if names is not None and (
            not isinstance(names, (list, tuple)) or len(names) > len(group["params"])
        ):  # fewer where parameters were appended to a named group by hand (torch.optim saves so)
            raise ValueError(
                f"{where} has param_names {names!r} for {len(group['params'])} parameters"
            )


def check_saved_groups(
    saved_groups: Sequence[Mapping[str, Any]],
    groups: Sequence[Mapping[str, Any]],
    router: Router,
) -> None:
    """``ValueError`` naming the group and the value unless every saved group in
    ``saved_groups`` (as many as ``groups``, the optimizer's, each with as many parameters) has
    a valid ``lr``, ``weight_decay``, ``skipped_steps``, ``maximize``, ``role`` and ``rule``
    (one ``router``'s backend computes), and, where it and the optimizer's group both name their
    parameters, the same names in the same order; and that no parameter id is listed twice
    (torch.optim would load its state onto the last parameter listed so, and none onto the
    first)."""
    listed: set = set()
    for g, saved in enumerate(saved_groups):
        for pid in saved["params"]:
            if pid in listed:
                raise ValueError(
                    f"the state_dict's param group {g} lists parameter id {pid!r}, which an "
                    "earlier position lists too: each parameter's state would not load onto it"
                )
            listed.add(pid)
    for g, (saved, group) in enumerate(zip(saved_groups, groups)):
        where = f"the state_dict's param group {g}"
        check_lr(group_entry(saved, "lr", where))
        check_lr(group_entry(saved, "weight_decay", where), "weight_decay")
        skip_count(saved.get("skipped_steps", 0), where)
        check_flag(saved.get("maximize", False), "maximize")
        router.check_group(
            saved.get("role", AUTO), saved.get("rule"), f"state_dict's param group {g}"
        )
        router.check_runs([{**saved, "params": group["params"]}])
        saved_names, names = saved.get("param_names"), group.get("param_names")
        if saved_names is not None and names is not None:
            check_same_order(list(saved_names), list(names), where)


def plain_name(name: Any) -> Any:
    """``name`` without the modules wrappers insert (:data:`WRAPPERS`): ``module._orig_mod.fc.w``
    is ``fc.w``; anything but a string is itself."""
    if not isinstance(name, str):
        return name
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


def check_same_order(saved: Sequence[Any], names: Sequence[Any], where: str) -> None:
    """``ValueError`` naming both names where ``saved`` (a saved group's ``param_names``) has at
    some position a name that ``names`` (the optimizer's group's) has at another: the states
    would load onto the wrong parameters. Compared by :func:`plain_name`; a saved name the
    optimizer does not have loads by position (a renamed model), as torch.optim loads it."""
    was, now = [plain_name(n) for n in saved], [plain_name(n) for n in names]
    if was == now:
        return
    position = {name: i for i, name in enumerate(now) if isinstance(name, Hashable)}
    for i, name in enumerate(was):
        moved = position.get(name) if isinstance(name, Hashable) else None
        if moved is not None and moved != i:
            raise ValueError(
                f"{where} lists parameter {saved[i]!r} at position {i}, where this optimizer "
                f"has {names[i]!r} and lists it at position {moved}: it was saved in another "
                "order, and its states would load onto the wrong parameters (reorder it in a "
                "register_load_state_dict_pre_hook, or build the optimizer as it was)"
            )
