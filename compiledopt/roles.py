"""Parameter roles: what a parameter is in its model, and which update rule each role gets.

A *role* says what a parameter is: ``matrix`` (a weight inside the network: a linear or
convolution layer), ``vector`` (rank 0 or 1: biases, normalisation gains), ``embedding`` (a
lookup table, ``nn.Embedding``), ``head`` (the output layer, the model's last ``nn.Linear``) or
``input`` (the first layer that reads the model's input, when the model has no embedding). A
*rule* says how it is updated; a learned optimizer with a harness names several (see
:meth:`Transform.rules <compiledopt.transforms.Transform.rules>`), and its artifact maps every
role to one of them (its ``routes``, recorded in the manifest).

Roles are a property of the parameter group, decided once: a group's ``role`` is one of
:data:`ROLES`, or ``"auto"`` (the default), which takes each parameter's role from its rank —
``matrix`` for rank ≥ 2, ``vector`` below — so an optimizer built from ``model.parameters()``
needs no model. :func:`param_groups` reads the model's module types instead, and so finds its
embeddings, output layer and input layer. A group may also name its ``rule`` outright, which
overrides the artifact's route for every parameter of the group. Both keys are ordinary
param-group entries: ``state_dict()`` carries them and ``load_state_dict`` restores them.
"""

from typing import Any, Dict, List, Mapping, Optional, Tuple

from torch import Tensor, nn

__all__ = [
    "AUTO",
    "NORM_TYPES",
    "ROLES",
    "check_role",
    "check_routes",
    "param_groups",
    "roles_of",
    "shape_role",
]

#: What a parameter can be in its model; an artifact routes each role to one of its transform's
#: rules (``Transform.rules``).
ROLES = ("matrix", "vector", "embedding", "head", "input")
AUTO = "auto"
#: Normalisation layers: their parameters are ``vector`` whatever their shape.
NORM_TYPES: Tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
_CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def shape_role(param: Tensor) -> str:
    """The role of a parameter known by its shape alone: ``matrix`` for rank ≥ 2, else
    ``vector``."""
    return "matrix" if param.dim() >= 2 else "vector"


def check_role(role: Any, where: str = "role") -> str:
    """``role`` if it is one of :data:`ROLES` or ``"auto"``, else ``ValueError`` naming it."""
    if not isinstance(role, str) or (role != AUTO and role not in ROLES):
        raise ValueError(f"Invalid {where}: {role!r} (one of {(AUTO, *ROLES)})")
    return role


def check_routes(routes: Any, rules: Tuple[str, ...], where: str = "routes") -> Dict[str, str]:
    """``routes`` (a mapping of roles to rules) checked: every key one of :data:`ROLES`, every
    value one of ``rules``; roles it leaves out are ``"artifact"``. ``ValueError`` names the
    offending entry."""
    if not isinstance(routes, Mapping):
        raise ValueError(f"Invalid {where}: {routes!r} (a mapping of roles to rules)")
    checked = dict.fromkeys(ROLES, "artifact")
    for role, rule in routes.items():
        if role not in ROLES:
            raise ValueError(f"Invalid {where}: unknown role {role!r} (roles are {ROLES})")
        if not isinstance(rule, str) or rule not in rules:
            raise ValueError(f"Invalid {where}: role {role!r} has rule {rule!r} (one of {rules})")
        checked[role] = rule
    return checked


def roles_of(model: nn.Module) -> Dict[int, str]:
    """The role of each parameter of ``model`` by ``id``, from its module types (see the module
    doc): ``nn.Embedding`` weights are ``embedding``; parameters of normalisation layers and of
    rank ≤ 1 are ``vector``; the weight of the last ``nn.Linear`` (in registration order) is
    ``head`` unless it is an embedding's (tied); when no embedding comes before it, the weight of
    the first ``nn.Linear`` or convolution is ``input`` (unless it is also the head: a single
    linear layer is the head); every other weight is ``matrix``."""
    roles: Dict[int, str] = {}
    linear: List[nn.Linear] = []
    first: Optional[nn.Module] = None
    seen_embedding = False
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            roles.setdefault(id(module.weight), "embedding")
            seen_embedding = True
        elif isinstance(module, NORM_TYPES):
            for param in module.parameters(recurse=False):
                roles.setdefault(id(param), "vector")
        elif isinstance(module, (nn.Linear, *_CONV_TYPES)):
            if isinstance(module, nn.Linear):
                linear.append(module)
            if first is None and not seen_embedding:
                first = module
    if linear and id(linear[-1].weight) not in roles:
        roles[id(linear[-1].weight)] = "head"
    if first is not None and id(first.weight) not in roles:
        roles[id(first.weight)] = "input"
    for param in model.parameters():
        roles.setdefault(id(param), shape_role(param))
    return roles


def param_groups(model: nn.Module, **options: Any) -> List[Dict[str, Any]]:
    """``model``'s parameters in one param group per role (in the order of :data:`ROLES`, empty
    roles left out), each ``{"params": [(name, param), ...], "role": role}`` plus ``options``
    (e.g. ``lr``, ``weight_decay``, or ``rule`` to override the artifact's routes). Parameters
    that do not require a gradient are left out. Any ``torch.optim`` optimizer takes these
    groups too (it keeps the ``role`` entry and ignores it).

    Example:
        >>> model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10))
        >>> for group in param_groups(model):
        ...     print(group["role"], [name for name, _ in group["params"]])
        matrix ['1.weight']
        vector ['1.bias', '2.bias']
        embedding ['0.weight']
        head ['2.weight']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"param_groups needs an nn.Module, got {type(model).__name__}")
    for key in ("params", "role"):
        if key in options:
            raise ValueError(f"param_groups sets {key!r} itself; it cannot be an option")
    if "rule" in options and not isinstance(options["rule"], str):
        raise ValueError(f"Invalid rule: {options['rule']!r} (a rule name)")
    roles = roles_of(model)
    grouped: Dict[str, Tuple[List[str], List[Tensor]]] = {role: ([], []) for role in ROLES}
    for name, param in model.named_parameters():
        if param.requires_grad:
            names, params = grouped[roles[id(param)]]
            names.append(name)
            params.append(param)
    return [
        {"params": list(zip(names, params)), "role": role, **options}
        for role, (names, params) in grouped.items()
        if params
    ]
