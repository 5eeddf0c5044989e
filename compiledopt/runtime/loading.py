"""What ``FrozenOptimizer.load_state_dict`` checks of a saved state_dict's param groups before it
loads anything: each group's hyper-parameters, role and rule, as the constructor checks a group
given to it, and that the saved groups list the same parameters, by name, as the optimizer's.

torch.optim matches saved states to parameters by position alone, and a saved group's
``param_names`` replace the optimizer's: a state_dict saved with the parameters in another
order (two of one shape swapped, say) would load each state onto the wrong parameter and
rename the parameters after it, silently. Where both name their parameters, the names must
match; a ``register_load_state_dict_pre_hook`` can reorder a state_dict first.
"""

from typing import Any, Mapping, Sequence

from compiledopt._validation import check_flag
from compiledopt.roles import AUTO
from compiledopt.runtime.routing import Router
from compiledopt.runtime.state import check_lr, group_entry, skip_count

__all__ = ["check_saved_groups"]


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
        if saved_names is None or names is None or list(saved_names) == list(names):
            continue
        for i, (was, now) in enumerate(zip(saved_names, names)):
            if was != now:
                raise ValueError(
                    f"{where} lists parameter {was!r} at position {i}, where this optimizer "
                    f"has {now!r}: it was saved with other parameters or in another order, and "
                    "its states would load onto the wrong parameters (reorder it in a "
                    "register_load_state_dict_pre_hook, or build the optimizer as it was)"
                )
